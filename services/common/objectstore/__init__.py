"""The object store every service reads and writes through: a local folder (embedded mode) or an S3 API
(MinIO on a cluster), behind one `ObjectStore` interface, built from `ObjectStoreSettings`."""
