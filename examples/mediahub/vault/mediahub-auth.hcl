# The secrets engine policy of the auth service's instances (shipyard.yaml: vault.policies), applied by `shipyard up`.
# Read only: its signing key and password pepper are made by `up` from vault/secrets.yaml (or by an operator), so a
# compromised auth instance can read them but never replace the key the gateway trusts.
path "secret/data/mediahub/auth" {
  capabilities = ["read"]
}
