# What `shipyard up --acl` grants the auth service's instances beyond their own token's defaults (their service,
# the catalog, the mediahub/auth/ ... KV prefix of their name, the bus): auth registers the gateway's jwt consumer
# and credential through the gateway admin API (docs/acl.md).
gateway = "write"
