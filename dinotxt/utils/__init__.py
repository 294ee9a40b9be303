"""The ground floor every other package stands on: atomic files (``fileio``), one-line errors and
logging (``log``), plugins and lazy imports (``plugins``), dtype helpers (``precision``)."""
