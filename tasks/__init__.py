"""tvmflow steps: plain functions, one module per pipeline step."""
