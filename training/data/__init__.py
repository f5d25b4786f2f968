"""Training data, by concept.

- `columns`: how a table's columns are read and checked (CSV, Parquet), shared by both readers;
- `series`: multivariate time series in memory (`SeriesTable`, `load_series`, `split_series`);
- `images`, `image_files`: image sets (`ImageSet`, `load_images`, `split_images`) and their files;
- `streamed`: a Parquet series larger than memory, read in record batches (`SeriesStream`);
- `splits`: the four parts and their size rules, and `Splits`, what training, calibration and
  evaluation ask of data cut into parts;
- `prepared`: `Splits` in memory (series windows, images), as the training job prepares them;
- `out_of_core`: `Splits` read again on every pass, as training larger than memory needs;
- `for_detector`: data read for an existing detector (`aewatch score`, `evaluate`, ...).
"""
