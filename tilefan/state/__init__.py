"""Job state and storage: the DynamoDB job table and the S3 bucket behind small interfaces."""
