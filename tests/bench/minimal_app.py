"""The floor for the API benchmark: a minimal Flask route returning a fixed body of a given size."""
import os

from flask import Flask


def create_app():
    body = open(os.environ["MINIMAL_BODY_FILE"], "rb").read()
    app = Flask("minimal")

    @app.get("/v1/items/<item_id>/similar")
    def similar(item_id):
        return app.response_class(body, mimetype="application/json")

    @app.get("/readyz")
    def readyz():
        return "ok"

    return app
