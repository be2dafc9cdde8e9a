# What `shipyard up --acl` grants the auth service's instances beyond their own token's defaults (their service,
# the catalog, the auth/ KV prefix, the bus): auth registers the gateway's jwt consumer and credential through the
# gateway admin API, and reads its settings under mediahub/auth/ (docs/acl.md).
gateway = "write"
key_prefix "mediahub/auth/" { policy = "read" }
