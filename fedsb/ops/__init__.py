"""Operations: deployment topology and compose files, certificates, the node's on-disk basis cache."""
