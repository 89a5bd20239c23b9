"""Input pipeline: TFDS random-access sources -> grain transforms -> global sharded arrays."""
