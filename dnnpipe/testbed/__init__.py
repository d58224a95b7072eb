"""Emulated devices on one host: each in its own network namespace and shaped link, computing at its own pace.

`cores` (what this process may use), `pacing` (planned stage and link times, pure), `netns` (namespaces,
veths, bridge and tbf via iproute2), `local` (every stage of a manifest as its own process on this host: the
workstation's `run-local`, never shipped to a board), `command` (`run-local`: a paced pipeline on the testbed, or
on loopback when it cannot be).
"""
