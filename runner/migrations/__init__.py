"""SQL migrations of the ledger's server backends, applied in file-name order."""
