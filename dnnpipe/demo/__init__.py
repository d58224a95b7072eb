"""The one-command demo: every step of the toolkit on this machine (run), its report (report), its command."""
