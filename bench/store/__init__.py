"""The store: the database (the only schema), claims on work, checkpoint folders and
the factories that rebuild outside models. Imports the core and nothing above it."""
