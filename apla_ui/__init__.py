"""apla-ui: the one-shot loop in a browser (a Gradio app).

Upload a clip, train (``apla_train``'s CLI as a background job), export (``export``'s CLI),
generate with ``apla_rt.Pipeline``, compare the results. Everything lives in a workspace of
plain folders that the CLIs read and write too (``apla_ui.workspace``). This package sits
above ``apla_rt``, ``apla_train`` and ``export``; nothing imports it.
"""
