"""Scoring model answers: the field's metrics (`metrics`), confidence intervals and paired comparisons
(`stats`), and the runner behind `idefics2 eval` (`runner`)."""
