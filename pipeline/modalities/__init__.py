"""Input modalities (series of readings, images): how records of each become samples and events."""
