"""Reading results back from the tracking store: figures and reports (see issue 4)."""
