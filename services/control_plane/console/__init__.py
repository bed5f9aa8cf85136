"""The web console: server-rendered pages (Jinja2) and plain JavaScript modules that call the `/v1` API
with the session cookie the login page sets. No build step: templates and static files ship in the
package."""
