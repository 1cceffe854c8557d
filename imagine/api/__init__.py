"""HTTP face of Imagine: schemas, routes (over `service.JobService`), auth, errors, header/Range parsing (`http`)
and media intake (`intake`). Imports neither torch nor PyAV at start (edits load PyAV on first use)."""
