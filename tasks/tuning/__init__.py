"""tvmflow tuning."""
