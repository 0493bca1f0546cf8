"""The science: admission checks, the adaptive choice of attacks, reliability flags and
the linearized-robustness diagnostics. Imports the plugins, the engine, the store and
the core."""
