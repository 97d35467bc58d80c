"""Runtime backends, one per file, each a `runtimes.session.Session` subclass registered in
`models.registry.BACKENDS` under its file name, with the formats it runs (`formats`: the artifacts it
is the default backend of; `also`: those it can run too). A module imports its format's runtime only
inside the functions that need it, so listing the backends loads none of them."""
