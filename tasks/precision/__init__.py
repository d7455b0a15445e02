"""tvmflow precision."""
