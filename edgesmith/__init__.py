"""The `edgesmith` command's entry point; the commands themselves belong to the packages they drive."""
