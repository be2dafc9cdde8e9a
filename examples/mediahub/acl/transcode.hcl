# The transcode worker reads its live settings under mediahub/transcode/ (docs/acl.md).
key_prefix "mediahub/transcode/" { policy = "read" }
