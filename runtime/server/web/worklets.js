// Audio worklets of the opens2s-edge page: the microphone tap and the streaming player. They run on the audio
// rendering thread; the page talks to them through their ports.

// Microphone: batches the input into ~100 ms blocks (at the context's rate) and posts them to the page.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = Math.round(sampleRate / 10);
    this.buffer = new Float32Array(this.block);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      let offset = 0;
      while (offset < channel.length) {
        const n = Math.min(channel.length - offset, this.block - this.filled);
        this.buffer.set(channel.subarray(offset, offset + n), this.filled);
        this.filled += n;
        offset += n;
        if (this.filled === this.block) {
          this.port.postMessage(this.buffer.slice(0));
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

// Player: a queue of reply samples played as they arrive; "clear" drops what is queued (barge-in). Reports how many
// samples it has played, so the page can show it and say how much of the reply was heard.
class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.head = 0;
    this.played = 0;
    this.reported = 0;
    this.port.onmessage = (event) => {
      if (event.data.type === "clear") {
        this.queue = [];
        this.head = 0;
      } else if (event.data.type === "push") {
        this.queue.push(event.data.samples);
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const chunk = this.queue[0];
      const n = Math.min(out.length - i, chunk.length - this.head);
      out.set(chunk.subarray(this.head, this.head + n), i);
      i += n;
      this.head += n;
      this.played += n;
      if (this.head === chunk.length) {
        this.queue.shift();
        this.head = 0;
      }
    }
    out.fill(0, i);
    if (this.played - this.reported >= sampleRate / 20 || (i < out.length && this.played !== this.reported)) {
      this.reported = this.played;
      this.port.postMessage({ played: this.played, idle: this.queue.length === 0 });
    }
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
registerProcessor("player", PlayerProcessor);
