"""tvmflow devices."""
