"""A load as seven stages: the run's context, the stages in order, and the seam with transformers' loading."""
