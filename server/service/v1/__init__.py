"""Generated from protos/edgedistill/v1/*.proto by protos/generate.py: do not edit by hand."""
