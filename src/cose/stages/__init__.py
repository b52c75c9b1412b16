"""Stage drivers that dvc.yaml runs: thin layers over the library."""
