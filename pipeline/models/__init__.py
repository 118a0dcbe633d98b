"""Model families. Importing this package registers every model with timm's registry."""
