"""User interfaces: command line, web UI and server."""
