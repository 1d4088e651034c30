"""``python -m retrieval_heads.cli`` runs the ``retrieval-heads`` command."""

if __name__ == "__main__":
    from retrieval_heads.cli import main

    raise SystemExit(main())
