"""Studies on top of evaluation: label efficiency, the results table and the HTML report.
They read stores and results only."""
