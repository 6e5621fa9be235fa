"""The `docker` sandbox backend (`backend.py`), its in-container driver (`driver.py`), the image
definition (`Dockerfile`) and `setup-engine.sh`, which starts a private dockerd and builds the
image offline (`make docker-engine`). Importing this package imports nothing else."""
