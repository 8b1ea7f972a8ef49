"""The application floor: the plateflow command line, its local server, the demo."""
