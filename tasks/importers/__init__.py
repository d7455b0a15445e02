"""tvmflow importers."""
