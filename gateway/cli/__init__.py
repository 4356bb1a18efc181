"""The ``gateway`` command line: thin commands that parse, call a service, print."""
