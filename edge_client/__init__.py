"""Edge client: the Flower ClientApp that trains on private data and uploads weights only."""
