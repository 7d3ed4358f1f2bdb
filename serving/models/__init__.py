"""Every model kind behind one protocol (``base.Model``): the recommender (similar items, user and
session recommendations), the built-in rating model and scikit-learn predictors; ``registry`` maps a
kind to its class and loads the models a snapshot lists, one folder each."""
