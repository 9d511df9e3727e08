"""`tcrlsd inspect`: browse an iteration's samples and see which tokens the teacher disagreed with.

One concern per module:

- :mod:`.load`   finds an iteration's artifacts and scans them lazily (polars), column by column;
- :mod:`.views`  the list (filters, sort, pages), one sample, one group, as plain Python data;
- :mod:`.tokens` token strings from the policy's ``tokenizer.json`` (tokenizers only, no torch);
- :mod:`.safe_text` makes untrusted model text inert (control characters made visible);
- :mod:`.palette` the Δ_t colour scale shared by terminal and HTML;
- :mod:`.formats` the ``FORMATS`` registry of renderers :mod:`.render_terminal`,
  :mod:`.render_html`, :mod:`.render_jsonl`, each ``(View, RenderOptions) -> str``.

Model text (problems, responses, critiques, teacher contexts) is untrusted: every renderer shows it
literally. Nothing here imports torch or transformers, so the command starts in well under a second.
"""
