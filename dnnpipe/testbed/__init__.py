"""Emulated devices on one host: each in its own network namespace and shaped link, computing at its own pace.

`cores` (what this process may use), `pacing` (planned stage and link times, pure), `netns` (namespaces,
veths, bridge and tbf via iproute2), `command` (`run-local`: a paced pipeline on the testbed, or on loopback when
it cannot be).
"""
