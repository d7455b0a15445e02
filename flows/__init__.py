"""tvmflow Prefect flows and the `tvmflow` command."""
