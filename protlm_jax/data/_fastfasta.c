/* Fast path of protlm_jax.fasta: split a block of whole FASTA records.
 *
 * records(text) takes bytes that start with '>' and end with '\n' (whole
 * records, as fasta._blocks yields them) and returns a list with one tuple per
 * record:
 *   (header: bytes, sequence: str or None, body: bytes or None, lines: int)
 * For a record whose sequence lines hold only A-Z (and line breaks), sequence
 * is the joined sequence and body is None. Otherwise sequence is None and body
 * holds the raw sequence lines, for the counted normalisation in Python.
 * lines is the number of lines the record spans (header included).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *records(PyObject *self, PyObject *args) {
    const char *buf;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y#", &buf, &n)) return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    char *seq = PyMem_Malloc(n > 0 ? (size_t)n : 1);
    if (seq == NULL) { Py_DECREF(out); return PyErr_NoMemory(); }
    Py_ssize_t i = 0;
    while (i < n) {
        /* Header line: after '>' up to '\n' (a trailing '\r' is dropped). */
        Py_ssize_t hs = i + 1;
        const char *nl = memchr(buf + hs, '\n', (size_t)(n - hs));
        Py_ssize_t he = nl ? nl - buf : n;
        Py_ssize_t next = nl ? he + 1 : n;
        if (he > hs && buf[he - 1] == '\r') he--;
        long lines = 1;
        Py_ssize_t body_start = next, k = 0;
        int clean = 1;
        i = next;
        /* Sequence lines until a line starting with '>' or the end. */
        while (i < n && buf[i] != '>') {
            const char *e = memchr(buf + i, '\n', (size_t)(n - i));
            Py_ssize_t le = e ? e - buf : n;
            for (Py_ssize_t j = i; j < le; j++) {
                unsigned char c = (unsigned char)buf[j];
                if (c >= 'A' && c <= 'Z') {
                    seq[k++] = (char)c;
                } else if (c != '\r') {
                    clean = 0;
                }
            }
            lines++;
            i = e ? le + 1 : n;
        }
        Py_ssize_t body_end = i;
        PyObject *header = PyBytes_FromStringAndSize(buf + hs, he - hs);
        PyObject *sequence, *body;
        if (clean) {
            sequence = PyUnicode_DecodeLatin1(seq, k, NULL);
            body = Py_None;
            Py_INCREF(body);
        } else {
            sequence = Py_None;
            Py_INCREF(sequence);
            body = PyBytes_FromStringAndSize(buf + body_start, body_end - body_start);
        }
        PyObject *item = NULL;
        if (header && sequence && body) {
            item = Py_BuildValue("(NNNl)", header, sequence, body, lines);
        } else {
            Py_XDECREF(header);
            Py_XDECREF(sequence);
            Py_XDECREF(body);
        }
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            PyMem_Free(seq);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyMem_Free(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"records", records, METH_VARARGS,
     "records(text) -> [(header, sequence|None, body|None, lines)] for whole FASTA records."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastfasta",
    "C fast path for protlm_jax.fasta (block splitting and clean-record joining).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fastfasta(void) { return PyModule_Create(&module); }
