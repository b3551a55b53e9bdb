"""A client for any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, ...), standard library only.

    answer = ask(url, model, messages, schema)   # the reply parsed as JSON that the endpoint constrained to schema

Used by prepare.py (entities from a caption) and models/judge.py (eval.py's VLM judges). Images go in as data URLs (`image_part`).
Every failure ends as ChatError, one sentence naming the endpoint and what went wrong, after `retries` tries.
"""
import base64
import io
import json
import time
import urllib.error
import urllib.request


class ChatError(RuntimeError):
    """An endpoint that could not be reached, failed, or answered outside the schema, after every retry."""


def image_part(frame):
    """A uint8 [H, W, 3] numpy frame as a chat message part (a PNG data URL)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format='PNG')
    url = 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()
    return {'type': 'image_url', 'image_url': {'url': url}}


def request(model, messages, schema, name='answer', temperature=0.0, max_tokens=1024, seed=None):
    """The chat-completions request body: the reply constrained by a JSON schema (response_format json_schema);
    seed makes a sampled answer repeatable on servers that take one (vLLM, SGLang)."""
    body = {'model': model, 'messages': messages, 'temperature': temperature, 'max_tokens': max_tokens,
            'response_format': {'type': 'json_schema', 'json_schema': {'name': name, 'schema': schema, 'strict': True}}}
    return body if seed is None else {**body, 'seed': seed}


def post(url, body, timeout):
    """POST body to url/chat/completions; the decoded JSON response."""
    req = urllib.request.Request(url.rstrip('/') + '/chat/completions', data=json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def parse(response, schema):
    """The first choice's content as JSON, checked against the schema's required keys and top-level types."""
    content = response['choices'][0]['message']['content']
    answer = json.loads(content)
    if not isinstance(answer, dict):
        raise ValueError(f'the answer is not a JSON object: {content[:80]!r}')
    for key in schema.get('required', []):
        if key not in answer:
            raise ValueError(f'the answer has no {key!r}: {content[:80]!r}')
    types = {'string': str, 'number': (int, float), 'integer': int, 'boolean': bool, 'array': list, 'object': dict}
    for key, prop in schema.get('properties', {}).items():
        want = types.get(prop.get('type'))
        if key in answer and want and not isinstance(answer[key], want):
            raise ValueError(f'{key!r} is not of type {prop["type"]}: {content[:80]!r}')
        if key in answer and 'enum' in prop and answer[key] not in prop['enum']:
            raise ValueError(f'{key!r} is {answer[key]!r}, not one of {prop["enum"]}')
    return answer


def ask(url, model, messages, schema, retries=3, timeout=120.0, wait=1.0, **kw):
    """The endpoint's answer to messages as a dict that fits schema; tried `retries` times (waiting wait, 2 wait,
    ... between tries) on an unreachable endpoint, an HTTP error, a timeout or an answer outside the schema."""
    why = 'no try was made'
    for k in range(max(1, retries)):
        if k:
            time.sleep(wait * 2 ** (k - 1))
        try:
            return parse(post(url, request(model, messages, schema, **kw), timeout), schema)
        except urllib.error.HTTPError as err:
            why = f'HTTP {err.code} {err.reason}'
        except (urllib.error.URLError, ConnectionError) as err:
            why = f'unreachable ({getattr(err, "reason", err)})'
        except TimeoutError:
            why = f'no answer within {timeout:g} s'
        except (ValueError, KeyError, IndexError, TypeError) as err:  # not JSON, or not the schema
            why = f'an answer outside the schema ({err})'
    raise ChatError(f'{url} (model {model}): {why}, after {max(1, retries)} tries')
