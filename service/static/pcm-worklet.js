// The live mode's capture (app.js): each render quantum's first channel (128 float32 samples
// at the AudioContext's rate) goes to the page, which sends them to WS /v1/stream.
"use strict";

class PcmCapture extends AudioWorkletProcessor {
  process(inputs) {
    const channels = inputs[0];
    if (channels.length > 0) this.port.postMessage(channels[0].slice()); // a copy: reused
    return true; // keep running while the microphone is connected
  }
}

registerProcessor("pcm-capture", PcmCapture);
