"""The fleet file (devices.yaml) and the Prefect deployments generated from it; a package so
that `pip install .` ships them beside the code that reads them."""
