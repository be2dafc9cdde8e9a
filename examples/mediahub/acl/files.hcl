# The files service reads its live settings (max_upload_mb...) under mediahub/files/ (docs/acl.md).
key_prefix "mediahub/files/" { policy = "read" }
