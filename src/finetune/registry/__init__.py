"""The only code that talks to MLflow's registry: the registration transaction, alias lease,
hygiene of killed runs, variants, verified loading, integrity, the pyfunc models."""
