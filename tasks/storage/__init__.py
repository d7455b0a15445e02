"""tvmflow storage."""
