"""tvmflow build."""
