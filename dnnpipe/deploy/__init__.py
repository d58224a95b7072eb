"""Shipping stages to devices: the registry (registry), how files move (transport), what moves and the
per-device report (ship), and starting/stopping the runtime on each device (launch)."""
