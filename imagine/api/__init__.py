"""HTTP face of Imagine: schemas, routes, errors."""
