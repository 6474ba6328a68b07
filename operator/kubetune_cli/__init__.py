"""The `kubetune` command line: validate, crd, run, operator."""
